from common.registry import register

register(
    "cost_reg_ot",
    description="Cost-regularized OT across spaces: sparse / group / low-rank linear maps by a proximal scheme (POT)",
    module="pipelines.cost_reg_ot.module:CostRegOTModule",
    datamodule="pipelines.cost_reg_ot.data:PairedSpacesDataModule",
    demo_seconds=3,
)
