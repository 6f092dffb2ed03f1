"""guie1: the Google Universal Image Embedding (Kaggle 2022) 1st-place recipe, as its write-up tells it, for GPUs.

open_clip ViT-H-14 (its CLIP image embedding, 1024-d) → dropout 0.2 → Linear to 64 (no BatchNorm) → L2N,
trained with a CosFace head (s = 30; the write-up calls it ArcFace) whose margin rises over the stages.
Our reading of the write-up, as this file's ``stages``:

1. head only (backbone frozen), 224 px, margin 0.55, the first two datasets;
2. the backbone, with the projection and the class rows frozen, at a 10× lower rate, margin 0.6, 224 px,
   more datasets (datasets are added stage by stage: ``datasets`` names ``train_sets`` entries);
3. 280 px, margin 0.65, every dataset;
4. 290 px with overlapping patches: stride 10 for patch 14 (a 4-px overlap), margin 0.65.

The descriptor is the mean of the net's 224- and 280-px descriptors (their resolution ensemble;
``resolutions``), 64-d as GUIE required. Weights come only from a file you name (nothing is
downloaded), e.g. the open_clip ViT-H-14 LAION-2B checkpoint:

    python experiments/guie1.py --set pretrained='"open_clip_pytorch_model.bin"' job -d 0,1,2,3
    python experiments/guie1.py export -m experiments/guie1/default/best.pth --image-size 280

Datasets are image-folder CSVs (``id,path,landmark_id[,domain]``) you prepare under ``data/guie/``
and GLDv2-clean; validation / evaluation is a folder CSV with a ``domain`` column (per-domain mP@5).
Epoch counts and rates are ours where the write-up gives none.
"""

from retrieval.runner import main

params = {
    "architecture": "open_clip:ViT-H-14",
    "pretrained": None,  # the open_clip checkpoint file, set on the command line
    "pooling": "cls",  # the CLIP image embedding: class token → ln_post → proj
    "fc_dim": 64,
    "dropout": 0.2,
    "neck_bn": False,
    "loss": "cosface",
    "s": 30.0,
    "margin": 0.55,
    "train_sets": [
        {"name": "products", "train_set": "folder:data/guie/products10k/train.csv"},
        {"name": "landmarks", "train_set": "gldv2-clean", "weight": 0.1},  # 1.58M images: a tenth per epoch
        {"name": "fashion", "train_set": "folder:data/guie/fashion/train.csv"},
        {"name": "other", "train_set": "folder:data/guie/other/train.csv"},  # food, art, cars, toys, ...
    ],
    "dataset": "folder:data/guie/val/images.csv",
    "data_root": "data",
    "seed": 0,
    "class_cap": 100,
    "augmentation": "soft",
    "batch_size": 64,
    "num_workers": 8,
    "optimizer": "adamw",
    "wd": 1e-4,
    "min_lr": 1e-6,
    "warmup_epochs": 0,
    "stages": [
        {"epochs": 4, "lr": 1e-3, "freeze_backbone": True, "margin": 0.55, "size_templates": [[224, 224]],
         "datasets": ["products", "landmarks"]},
        {"epochs": 2, "lr": 1e-4, "freeze_head": True, "freeze_neck": True, "margin": 0.6,
         "size_templates": [[224, 224]], "datasets": ["products", "landmarks", "fashion"]},
        {"epochs": 2, "lr": 5e-5, "freeze_head": True, "freeze_neck": True, "margin": 0.65,
         "size_templates": [[280, 280]]},
        {"epochs": 1, "lr": 2e-5, "freeze_head": True, "freeze_neck": True, "margin": 0.65,
         "size_templates": [[290, 290]], "patch_stride": 10},
    ],
    "amp": True,
    "grad_clip": 1.0,
    "save_every_steps": 2000,
    "val_dataset": "folder:data/guie/val/images.csv",
    "val_protocol": "mp@5",
    "val_at_start": False,
    # the descriptor: 224 + 280 px, averaged (64-d); images resized to a square as GUIE's were
    "resolutions": [224, 280],
    "resolution_combine": "mean",
    "image_size": 280,
    "resize": "square",
    "batch_size_eval": 128,
    "eval_ms": False,
    "eval_rerank": ["none"],
    "topk": None,
}

space = [
    {"resolution_combine": ["mean", "concat"]},
    {"loss": ["arcface"], "margin": [0.3]},
]

if __name__ == "__main__":
    main(params, space)
