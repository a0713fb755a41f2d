from common.registry import register

register(
    "drit",
    description="DRIT / DRIT++: diverse unpaired image-to-image translation with disentangled content and attribute codes",
    module="pipelines.drit.module:DRITModule",
    datamodule="pipelines.drit.data:UnpairedDataModule",
    demo_seconds=11,
)
