from common.registry import register

register(
    "setr",
    description="SETR: semantic segmentation with a pure ViT encoder and Naive / PUP / MLA decoders; mIoU with sliding-window and multi-scale inference",
    module="pipelines.setr.module:SETRModule",
    datamodule="pipelines.setr.data:SegDataModule",
    demo_seconds=18,
)
