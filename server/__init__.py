"""The aggregator: study orchestration, strategies, the server half of each protocol, registry and reports."""
