"""Data layer: image datasets with stable global sample ids, multi-view wrappers and SimCLR augmentations."""
from dual_emc2.data.augment import AugmentConfig, blur_kernel_size, eval_transform, simclr_transform
from dual_emc2.data.image_sets import (
    DATASETS,
    DatasetInfo,
    ImageSet,
    build_image_dataset,
    canonical_name,
    dataset_info,
    dataset_stats,
    load_class_list,
    native_image_size,
    read_idx,
)
from dual_emc2.data.views import EvalDataset, FirstN, MultiViewDataset, UnaugmentedLookup, take_first

__all__ = [
    "AugmentConfig", "blur_kernel_size", "eval_transform", "simclr_transform",
    "DATASETS", "DatasetInfo", "ImageSet", "build_image_dataset", "canonical_name", "dataset_info", "dataset_stats",
    "load_class_list", "native_image_size", "read_idx",
    "EvalDataset", "FirstN", "MultiViewDataset", "UnaugmentedLookup", "take_first",
]
