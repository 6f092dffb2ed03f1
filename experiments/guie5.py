"""guie5: the Google Universal Image Embedding 2022 5th-place recipe (Ota, Yokoi & Yamaoka, arXiv 2210.09495).

The open_clip ViT-H-14 image tower stays frozen; a head of BatchNorm'd linear layers on its CLIP
embedding is trained with ArcFace, then, from the class rows ArcFace learned, as a plain classifier
(a ``loss: softmax`` stage: the head switches kind and keeps its weights). Here that head is
dropout → Linear to 64 → BatchNorm1d (the neck), then L2N. Their training data: subsets of
Products-10K, GLDv2, GPR1200 and Food-101 (``train_sets``); their test-time augmentation of some
images is not part of this file. Epochs and rates are ours.

    python experiments/guie5.py --set pretrained='"open_clip_pytorch_model.bin"' job -d 0
"""

from retrieval.runner import main

params = {
    "architecture": "open_clip:ViT-H-14",
    "pretrained": None,  # the open_clip checkpoint file, set on the command line
    "pooling": "cls",
    "fc_dim": 64,
    "dropout": 0.1,
    "neck_bn": True,
    "loss": "arcface",
    "s": 30.0,
    "margin": 0.3,
    "train_sets": [
        {"name": "products", "train_set": "folder:data/guie/products10k/train.csv"},
        {"name": "landmarks", "train_set": "folder:data/guie/gldv2_subset/train.csv"},
        {"name": "gpr1200", "train_set": "folder:data/guie/gpr1200/train.csv"},
        {"name": "food", "train_set": "folder:data/guie/food101/train.csv"},
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
    "warmup_epochs": 0,
    "freeze_backbone": True,
    "stages": [
        {"epochs": 10, "lr": 1e-3, "loss": "arcface"},
        {"epochs": 5, "lr": 1e-4, "loss": "softmax"},
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
    {"margin": [0.2, 0.3, 0.4]},
]

if __name__ == "__main__":
    main(params, space)
