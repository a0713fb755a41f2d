"""A tiny pipeline used by the platform tests (registered through LIGHTYARD_PIPELINES=tests.toy)."""

from pathlib import Path

from common.registry import register

register(
    "toy",
    description="tiny MLP classifier on generated blobs (platform tests only)",
    module="tests.toy.module:ToyModule",
    datamodule="tests.toy.module:ToyData",
    config=str(Path(__file__).with_name("toy.yaml")),
)
