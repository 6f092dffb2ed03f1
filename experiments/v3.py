"""v3: Landmark2019's single-model recipe (arXiv 1906.04087) for GPUs: ResNet-101 + GeM + FC 512 + BN, ArcFace.

Weights from a file you name (nothing is downloaded), e.g. torchvision's or timm's ImageNet ResNet-101 state dict:
    python experiments/v3.py --set pretrained='"/path/to/resnet101.pth"' job -d 0,1,2,3
Train set: GLDv2-clean (``<data_root>/gldv2/metadata/train_clean.csv``, or a cleaned_subsets/*.csv via train_set);
validation and evaluation: Revisited Oxford, multi-scale (3 scales), as their runs did.
"""

from retrieval.runner import main

params = {
    "architecture": "resnet101",
    "pretrained": None,  # a state-dict path, set on the command line
    "pooling": "gem",
    "p": 3.0,
    "fc_dim": 512,
    "dropout": 0.0,
    "whitening": None,
    "loss": "arcface",
    "s": 30.0,
    "margin": 0.3,
    "train_set": "gldv2-clean",
    "dataset": "roxford5k",
    "data_root": "data",
    "seed": 0,
    "size_templates": "SS2",
    "scaleup_epochs": 1,  # the last epoch at larger templates with BatchNorm frozen
    "scaleup_templates": "M2",
    "augmentation": "soft",
    "batch_size": 32,
    "num_workers": 8,
    "optimizer": "sgd",
    "lr": 1e-3,
    "momentum": 0.9,
    "wd": 1e-5,
    "min_lr": 3e-6,
    "epochs": 5,
    "freeze_bn": True,
    "amp": True,
    "channels_last": True,
    "save_every_steps": 2000,
    "val_dataset": "roxford5k",
    "val_protocol": "medium",
    "val_at_start": False,
    "image_size": 1024,
    "resize": "auto",  # cirtorch's thumbnail for roxford5k / rparis6k, long side elsewhere
    "scale": "auto",  # aspect buckets for gldv2, each image its own size elsewhere (--scale)
    "batch_size_eval": 1,
    "scales": [0.75, 1.0, 1.25],  # their 3-scale test, descriptors averaged
    "eval_ms": True,
    "eval_rerank": ["none", "aqe", "adba+aqe"],
    "topk": None,
    "qe_n": 2,
    "dba_n": 2,
    "alpha": 3.0,
}

space = [
    {"loss": ["arcface", "cosface"], "margin": [0.3, 0.4]},
    {"loss": ["adacos"]},
]

if __name__ == "__main__":
    main(params, space)
