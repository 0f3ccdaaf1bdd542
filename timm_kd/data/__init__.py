"""Data for timm-kd: HF datasets, local image folders, the embedded digits dataset, timm transforms.

Every loader here returns an HF ``datasets.Dataset`` (or ``IterableDataset`` when streaming) whose
columns are ``"image"`` (``datasets.Image``) and ``"label"`` (int, ``ClassLabel`` when names are
known), whatever the source called them. ``apply_transform`` turns it into a torch dataset of
``{"pixel_values": Tensor[C, H, W], "label": int, "index": int}`` and ``create_loader`` batches it
reproducibly from a seed::

    train = load_image_dataset("embedded", "train")            # or "imagenet-1k", "./my_images"
    check_labels(train, num_classes=student.num_classes)       # before any training
    tf = create_timm_transform(student, is_training=True, dataset_name="embedded")
    loader = create_loader(apply_transform(train, tf, seed=0), batch_size=128, shuffle=True, seed=0)
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)                        # Accelerate's prepared loader does this
        for batch in loader:
            batch["pixel_values"], batch["label"], batch["num_skipped"]

Modules: ``sources`` (loading and label checks), ``images`` (decoding, the corrupt-image policy),
``pipeline`` (transforms, sampler, collate, loaders), ``embedded`` (the demo dataset: a real
100-class task built from the handwritten digits scikit-learn ships, so the whole pipeline runs
anywhere without a download).
"""
from .embedded import (
    EMBEDDED_CLASS_NAMES,
    EMBEDDED_NAME,
    EMBEDDED_TRANSFORM_KWARGS,
    embedded_source_pools,
    load_digits,
    make_embedded_dataset,
)
from .images import OnCorrupt, decode_image, default_record_dir, describe_image, undecoded, verify_images
from .pipeline import (
    SeededSampler,
    TransformedImageDataset,
    apply_transform,
    collate_images,
    create_loader,
    create_timm_transform,
    resolve_model_data_config,
    sample_seed,
    seeded_transform,
)
from .sources import check_labels, get_label_names, get_num_classes, load_image_dataset, split_validation

__all__ = [
    "EMBEDDED_NAME",
    "EMBEDDED_CLASS_NAMES",
    "EMBEDDED_TRANSFORM_KWARGS",
    "OnCorrupt",
    "make_embedded_dataset",
    "embedded_source_pools",
    "load_digits",
    "load_image_dataset",
    "split_validation",
    "get_label_names",
    "get_num_classes",
    "check_labels",
    "decode_image",
    "describe_image",
    "undecoded",
    "verify_images",
    "default_record_dir",
    "sample_seed",
    "seeded_transform",
    "apply_transform",
    "TransformedImageDataset",
    "SeededSampler",
    "collate_images",
    "create_loader",
    "resolve_model_data_config",
    "create_timm_transform",
]
