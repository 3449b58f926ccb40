"""What a segmentation plan may ask a site to build: a fixed allow-list of architectures and checked numbers.

The plan travels from the server with every training, evaluation and inference message, so every field of it
is chosen by someone the site does not trust. nnU-Net's own ``get_network_from_plans`` imports and calls
whatever class the plan names (``pydoc.locate``) with whatever keyword arguments it lists, which lets a plan
run code at the site. Here no name from the plan is ever imported: the architecture and each layer type are
looked up in tables of this module, every hyper-parameter must be a number (or flag) of the expected shape
and range, and an unknown key is refused. The network is then built exactly as nnU-Net builds it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from common.errors import ProtocolError

PLAN = "(plan)"
FIX = "use the plan the fingerprint phase of this fedbiopsy version makes"
PLAIN_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESENC_UNET = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
MAX_STAGES = 8
MAX_FEATURES = 1024
MAX_BLOCKS = 8


def _refuse(problem: str) -> ProtocolError:
    return ProtocolError(PLAN, problem, FIX)


def _architecture(name: object) -> Any:
    """The allowed architecture class for ``name`` (never imported by the name itself)."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

    allowed = {PLAIN_UNET: PlainConvUNet, RESENC_UNET: ResidualEncoderUNet}
    if not isinstance(name, str) or name not in allowed:
        raise _refuse("network_class_name is not one of the allowed architectures (nnU-Net's plain or residual "
                      "encoder U-Net)")
    return allowed[name]


def _layer_types() -> dict[str, dict[str | None, Any]]:
    """Each layer keyword's allowed values: nnU-Net's 3-D names -> the torch class."""
    from torch import nn

    return {
        "conv_op": {"torch.nn.modules.conv.Conv3d": nn.Conv3d},
        "norm_op": {"torch.nn.modules.instancenorm.InstanceNorm3d": nn.InstanceNorm3d,
                    "torch.nn.modules.batchnorm.BatchNorm3d": nn.BatchNorm3d},
        "dropout_op": {None: None, "torch.nn.modules.dropout.Dropout3d": nn.Dropout3d},
        "nonlin": {"torch.nn.LeakyReLU": nn.LeakyReLU, "torch.nn.modules.activation.LeakyReLU": nn.LeakyReLU,
                   "torch.nn.ReLU": nn.ReLU, "torch.nn.modules.activation.ReLU": nn.ReLU},
    }


def checked_int(key: str, value: object, low: int, high: int) -> int:
    """``value`` as an int in ``[low, high]`` (a bool is no int here), else a refusal naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _refuse(f"{key} must be an integer in [{low}, {high}]")
    return value


def checked_float(key: str, value: object, low: float, high: float) -> float:
    """``value`` as a finite float in ``[low, high]``, else a refusal naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= float(value) <= high:
        raise _refuse(f"{key} must be a number in [{low:g}, {high:g}]")
    return float(value)


def checked_bool(key: str, value: object) -> bool:
    """``value`` as a bool, else a refusal naming ``key``."""
    if not isinstance(value, bool):
        raise _refuse(f"{key} must be true or false")
    return value


def checked_ints(key: str, value: object, length: int, low: int, high: int) -> list[int]:
    """A list of ``length`` ints in ``[low, high]``."""
    if not isinstance(value, (list, tuple)) or len(value) != length:
        raise _refuse(f"{key} must be a list of {length} integer(s)")
    return [checked_int(f"{key}[{i}]", v, low, high) for i, v in enumerate(value)]


def _per_axis(key: str, value: object, stages: int, allowed: set[int]) -> list[list[int]]:
    """``stages`` triples (z, y, x) of values from ``allowed`` (kernel sizes, strides)."""
    if not isinstance(value, (list, tuple)) or len(value) != stages:
        raise _refuse(f"{key} must hold one (z, y, x) triple per stage")
    out = []
    for i, triple in enumerate(value):
        ints = checked_ints(f"{key}[{i}]", triple, 3, min(allowed), max(allowed))
        if any(v not in allowed for v in ints):
            raise _refuse(f"{key}[{i}] must take values in {sorted(allowed)}")
        out.append(ints)
    return out


def _options(key: str, value: object, schema: Mapping[str, Callable[[str, object], object]],
             allow_none: bool = False) -> dict[str, object] | None:
    """A small keyword dict (norm, dropout, nonlinearity options) with only the keys of ``schema``, checked."""
    if value is None and allow_none:
        return None
    if not isinstance(value, Mapping):
        raise _refuse(f"{key} must be a mapping of options")
    unknown = sorted(str(k) for k in value if k not in schema)
    if unknown:
        raise _refuse(f"{key} holds option(s) a site does not accept: {unknown[:3]}")
    return {k: schema[k](f"{key}.{k}", v) for k, v in value.items()}


_OPTION_SCHEMAS: dict[str, dict[str, Callable[[str, object], object]]] = {
    "norm_op_kwargs": {"eps": lambda k, v: checked_float(k, v, 1e-12, 1e-1), "affine": checked_bool,
                       "momentum": lambda k, v: checked_float(k, v, 0.0, 1.0)},
    "dropout_op_kwargs": {"p": lambda k, v: checked_float(k, v, 0.0, 0.9), "inplace": checked_bool},
    "nonlin_kwargs": {"inplace": checked_bool, "negative_slope": lambda k, v: checked_float(k, v, 0.0, 1.0)},
}


def nnunet_arch_kwargs(architecture: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The allowed class and checked keyword arguments of a plan's nnU-Net ``architecture`` entry.

    Raises :class:`ProtocolError` naming the first field that is not allowed; nothing is imported by a name
    the plan gives, and ``_kw_requires_import`` from the plan is not used.
    """
    cls = _architecture(architecture.get("network_class_name"))
    raw = architecture.get("arch_kwargs")
    if not isinstance(raw, Mapping):
        raise _refuse("arch_kwargs must be a mapping")
    stages = checked_int("n_stages", raw.get("n_stages"), 1, MAX_STAGES)
    blocks_key = "n_conv_per_stage" if cls.__name__ == "PlainConvUNet" else "n_blocks_per_stage"
    layer_types = _layer_types()
    kwargs: dict[str, Any] = {
        "n_stages": stages,
        "features_per_stage": checked_ints("features_per_stage", raw.get("features_per_stage"), stages, 1,
                                           MAX_FEATURES),
        "kernel_sizes": _per_axis("kernel_sizes", raw.get("kernel_sizes"), stages, {1, 3, 5}),
        "strides": _per_axis("strides", raw.get("strides"), stages, {1, 2}),
        blocks_key: checked_ints(blocks_key, raw.get(blocks_key), stages, 1, MAX_BLOCKS),
        "n_conv_per_stage_decoder": checked_ints("n_conv_per_stage_decoder", raw.get("n_conv_per_stage_decoder"),
                                                 stages - 1, 1, MAX_BLOCKS),
        "conv_bias": checked_bool("conv_bias", raw.get("conv_bias")),
    }
    for key, allowed in layer_types.items():
        value = raw.get(key)
        if not (value is None or isinstance(value, str)) or value not in allowed:
            raise _refuse(f"{key} is not one of the allowed 3-D layer types")
        kwargs[key] = allowed[value]
    for key, schema in _OPTION_SCHEMAS.items():
        kwargs[key] = _options(key, raw.get(key), schema, allow_none=key == "dropout_op_kwargs")
    unknown = sorted(str(k) for k in raw if k not in kwargs)
    if unknown:
        raise _refuse(f"arch_kwargs holds key(s) a site does not accept: {unknown[:3]}")
    return cls, kwargs


def monai_unet_kwargs(monai: Mapping[str, Any]) -> dict[str, Any]:
    """Checked channels, strides and residual units of a plan's MONAI U-Net."""
    if not isinstance(monai, Mapping):
        raise _refuse("monai must be a mapping")
    channels = monai.get("channels")
    n = len(channels) if isinstance(channels, (list, tuple)) else 0
    if not 2 <= n <= MAX_STAGES:
        raise _refuse(f"monai.channels must list 2 to {MAX_STAGES} integers")
    return {"channels": tuple(checked_ints("monai.channels", channels, n, 1, MAX_FEATURES)),
            "strides": tuple(checked_ints("monai.strides", monai.get("strides"), n - 1, 1, 2)),
            "num_res_units": checked_int("monai.num_res_units", monai.get("num_res_units"), 0, 4)}


def io_channels(plan: Mapping[str, Any]) -> tuple[int, int]:
    """Input channels (one per sequence) and output classes of a plan, checked."""
    sequences = plan.get("sequences")
    if not isinstance(sequences, (list, tuple)) or not 1 <= len(sequences) <= 16 \
            or not all(isinstance(s, str) for s in sequences):
        raise _refuse("sequences must list 1 to 16 sequence names")
    return len(sequences), checked_int("num_classes", plan.get("num_classes"), 2, 16)
