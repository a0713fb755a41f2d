from common.registry import register

register(
    "hog_gcn",
    description="HOG-GCN: homophily-guided adaptive propagation (sparse k-hop support) vs MLP/GCN/GAT/GPR-GNN/H2GCN (PyG)",
    module="pipelines.hog_gcn.module:HogGCNModule",
    datamodule="pipelines.hog_gcn.data:GraphDataModule",
    demo_seconds=11,
)
