"""v4: a small ViT universal embedding (GeM over patch tokens → 64-d projection, CosFace) on the built-in benchmark.

The GUIE 2022 shape at CPU scale: a ViT backbone, dropout + linear projection to 64 + L2N (no
BatchNorm), a CosFace head, judged by mAP and GUIE's mP@5. No ViT weights ship offline, so the
backbone (timm's ``vit_tiny_patch16_224`` shrunk to 4 blocks of width 128 on 128-px inputs) starts
from random weights and learns from the benchmark's train split alone (800 images, 100 landmarks
disjoint from the benchmark's): the numbers it reaches are a from-scratch ViT's after a few CPU
minutes, far below a pretrained one. ``--set pretrained='"vit.pth"'`` starts from a timm state dict
of the same shape instead.

    python experiments/v4.py job -d 0        # train, extract, evaluate (mAP E/M/H and mP@5)
    python experiments/v4.py export -m experiments/v4/default/best.pth
"""

from retrieval.runner import main

params = {
    # net: a small ViT, GeM over its patch tokens, dropout → Linear(64), L2N
    "architecture": "vit_tiny_patch16_224",
    "backbone_kwargs": {"depth": 4, "embed_dim": 128, "num_heads": 4, "img_size": 128},
    "pretrained": None,
    "pooling": "gem_tokens",
    "p": 3.0,
    "fc_dim": 64,
    "dropout": 0.1,
    "neck_bn": False,
    "whitening": None,
    # head and loss
    "loss": "cosface",
    "s": 30.0,
    "margin": 0.3,
    # data: the benchmark's train split; square-ish templates that are patch multiples
    "train_set": "synthetic",
    "dataset": "synthetic",
    "synthetic_size": "default",
    "seed": 0,
    "data_root": "data",
    "size_templates": [[144, 112], [128, 128], [112, 144]],
    "augmentation": "soft",
    "batch_size": 32,
    "num_workers": 2,
    # optimisation: AdamW with warm-up and a cosine, the usual ViT recipe
    "optimizer": "adamw",
    "lr": 1e-3,
    "wd": 0.05,
    "min_lr": 1e-5,
    "epochs": 6,
    "warmup_epochs": 1,
    "grad_clip": 1.0,
    # validation: held-out train landmarks; best.pth by mP@5
    "val_dataset": "heldout",
    "val_classes": 0.1,
    "val_protocol": "mp@5",
    # evaluation: single scale, long side 128 (the ViT takes any size: patch-grid rounding, resampled positions)
    "image_size": 128,
    "resize": "long",
    "batch_size_eval": 64,
    "eval_ms": False,
    "eval_rerank": ["none"],
    "topk": None,
}

space = [
    {"pooling": ["cls", "avg_tokens", "gem_tokens"]},
    {"loss": ["arcface", "cosface"], "margin": [0.2, 0.3]},
]

if __name__ == "__main__":
    main(params, space)
