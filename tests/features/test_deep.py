"""Deep features: mask-pooled activations of small randomly initialised MONAI networks on a phantom."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from client.features.deep import deep_feature_table, deep_features, find_layer, pooled_activations
from client.features.radiomics import ExtractionError
from simulations.phantoms import simulate_patient


@pytest.fixture(scope="module")
def phantom() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(2, 32, 32, 32) z-scored T2w+CET1, the tumour mask, and a second mask elsewhere in the body."""
    p = simulate_patient(0, 1, size=32, seed=0)
    image = np.stack([p.images["T2w"], p.images["CET1"]]).astype(np.float32)
    image = (image - image.mean(axis=(1, 2, 3), keepdims=True)) / image.std(axis=(1, 2, 3), keepdims=True)
    other = np.zeros_like(p.mask)
    other[4:10, 12:20, 6:12] = 1
    assert not (other & (p.mask > 0)).any()
    return image, (p.mask > 0).astype(np.uint8), other


def _net(name: str) -> tuple[nn.Module, str, int]:
    """A small randomly initialised MONAI network (seeded), the layer to read and its channel count."""
    from monai.networks.nets import DenseNet, DynUNet, UNet, resnet10

    torch.manual_seed(0)
    if name == "UNet":
        return UNet(spatial_dims=3, in_channels=2, out_channels=2, channels=(4, 8, 16), strides=(2, 2),
                    num_res_units=1), "bottleneck", 16
    if name == "DynUNet":
        return DynUNet(3, 2, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2],
                       filters=[4, 8, 12]), "bottleneck", 12
    if name == "DenseNet":
        return DenseNet(spatial_dims=3, in_channels=2, out_channels=2, init_features=8, growth_rate=4,
                        block_config=(2, 2)), "penultimate", 16
    return resnet10(spatial_dims=3, n_input_channels=2, num_classes=2), "penultimate", 512


@pytest.mark.parametrize("name", ["UNet", "DynUNet", "DenseNet", "ResNet"])
def test_monai_networks_shape_determinism_and_mask_dependence(name: str, phantom) -> None:
    image, mask, other = phantom
    net, layer, channels = _net(name)
    net.train()
    first = deep_features(net, image, mask, layer)
    assert list(first) == [f"deep_{i}" for i in range(channels)]
    assert all(type(v) is float and np.isfinite(v) for v in first.values())
    assert deep_features(net, image, mask, layer) == first  # deterministic
    assert net.training  # the caller's mode is restored
    elsewhere = pooled_activations(net, image, other, layer)
    assert np.abs(elsewhere - np.array(list(first.values()))).max() > 1e-3  # depends on where the tumour is


class _Probe(nn.Module):
    """A 'network' whose bottleneck is a 2x average pooling of its input: the pooled features are known."""

    def __init__(self) -> None:
        super().__init__()
        self.bottleneck = nn.AvgPool3d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(x) * 0.0


def test_pooling_is_the_mask_coverage_weighted_mean(phantom) -> None:
    image, mask, _ = phantom
    probe = _Probe()
    got = pooled_activations(probe, image, mask, "bottleneck", pad_multiple=1)

    def block_mean(a: np.ndarray) -> np.ndarray:
        return a.reshape(a.shape[0], 16, 2, 16, 2, 16, 2).mean(axis=(2, 4, 6))

    act = block_mean(image.astype(np.float64))
    weight = block_mean(mask[None].astype(np.float64))[0]
    expected = (act * weight).sum(axis=(1, 2, 3)) / weight.sum()
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # on the input grid (identity layer) it is the plain mean inside the tumour
    probe.bottleneck = nn.Identity()
    inside = pooled_activations(probe, image, mask, "bottleneck", pad_multiple=1)
    np.testing.assert_allclose(inside, image[:, mask > 0].mean(axis=1), rtol=1e-6)


def test_layers_by_name_and_errors(phantom) -> None:
    image, mask, _ = phantom
    net, _, _ = _net("UNet")
    module, use_input = find_layer(net, "model.1.submodule.1.submodule")
    assert module is find_layer(net, "bottleneck")[0] and not use_input
    with pytest.raises(ExtractionError, match="no layer"):
        find_layer(net, "model.9")
    with pytest.raises(ExtractionError, match="empty"):
        pooled_activations(net, image, np.zeros_like(mask))
    with pytest.raises(ExtractionError, match="no linear"):
        find_layer(net, "penultimate")


def test_deep_feature_table_over_a_site(small_sites: list[Path]) -> None:
    from common.validation import load_site

    site = load_site(small_sites[0])
    net, layer, channels = _net("UNet")
    frame, failures = deep_feature_table(net, site.cases, ("T2w", "CET1"), layer)
    assert not failures
    assert list(frame.index) == sorted(c.patient_id for c in site.cases)
    assert list(frame.columns) == [f"deep_{i}" for i in range(channels)]
    assert frame.notna().all().all() and frame.std().gt(0).any()
