"""guie9: the 9th-place GUIE 2022 CLIP notebook recipe: a frozen CLIP ViT-L/14 tower, a 64-d shipped embedding.

Inference: CLIP image embedding → dropout → dense 64 → L2N (the neck, no BatchNorm: what is shipped).
Training adds, behind that embedding, dropout → dense 256 (``head_fc_dim``: a training-only
projection, never in descriptors or exports) and the classification head: ArcFace first, then a
softmax stage from the rows ArcFace learned. This is our reading of the notebook's layers
(dropout + dense 256 + ArcFace / softmax for training, dropout + dense 64 + L2N for inference).
OpenAI's CLIP weights use QuickGELU, hence the ``-quickgelu`` config; name the file you have:

    python experiments/guie9.py --set pretrained='"ViT-L-14.pt"' job -d 0
"""

from retrieval.runner import main

params = {
    "architecture": "open_clip:ViT-L-14-quickgelu",
    "pretrained": None,  # an open_clip / OpenAI CLIP checkpoint file, set on the command line
    "pooling": "cls",
    "fc_dim": 64,
    "dropout": 0.2,
    "neck_bn": False,
    "head_fc_dim": 256,
    "head_dropout": 0.2,
    "loss": "arcface",
    "s": 30.0,
    "margin": 0.3,
    "train_sets": [
        {"name": "products", "train_set": "folder:data/guie/products10k/train.csv"},
        {"name": "landmarks", "train_set": "folder:data/guie/gldv2_subset/train.csv"},
    ],
    "dataset": "folder:data/guie/val/images.csv",
    "data_root": "data",
    "seed": 0,
    "size_templates": [[224, 224]],
    "augmentation": "soft",
    "batch_size": 128,
    "num_workers": 8,
    "optimizer": "adamw",
    "wd": 1e-4,
    "min_lr": 1e-6,
    "freeze_backbone": True,
    "stages": [
        {"epochs": 8, "lr": 1e-3, "loss": "arcface"},
        {"epochs": 4, "lr": 3e-4, "loss": "softmax"},
    ],
    "amp": True,
    "val_dataset": "folder:data/guie/val/images.csv",
    "val_protocol": "mp@5",
    "image_size": 224,
    "resize": "square",
    "batch_size_eval": 128,
    "eval_ms": False,
    "eval_rerank": ["none"],
    "topk": None,
}

space = [
    {"head_fc_dim": [128, 256, 512]},
]

if __name__ == "__main__":
    main(params, space)
