"""Teacher-output cache: store the teacher's top-k logits once, distill from them without a teacher.

A library that never imports the engine (building a cache runs the teacher, so it lives engine-side:
``timm_kd.engine.build_teacher_cache``). Its modules:

* ``logits``: top-k compression, the tail prior, ``expand_logits``, ``topk_error``;
* ``replay``: ``ReplayTransform`` (a view's random parameters, recorded and replayed) and the views a
  build runs the teacher on;
* ``store``: the folder's format, its manifest, and the primitives a build writes it with;
* ``reader``: ``TeacherCache``, the replaying training set, ``CachedTeacher`` (the teacher of a cached
  ``DistillWrapper``).

See ``docs/cache.md``.
"""

from .logits import (
    NO_LSE_MARGIN,
    TAIL_MODES,
    TAIL_PRIOR_MAX_CLASSES,
    TailPrior,
    check_top_k,
    compress_logits,
    expand_logits,
    index_dtype,
    topk_error,
)
from .reader import CachedTeacher, CachedViewDataset, TeacherCache, collate_cached
from .replay import (
    DETERMINISTIC_STEPS,
    REPLAYABLE_STEPS,
    ReplayedViews,
    ReplayTransform,
    collate_views,
    default_view_params,
)
from .store import (
    BUILD_KEYS,
    DATA_DIR,
    FORMAT_VERSION,
    MANIFEST_FILE,
    PRIOR_DIR,
    RECORDS_DIR,
    TAIL_PRIOR_FILE,
    TEACHER_KEYS,
    TRAIN_KEYS,
    ShardWriter,
    cache_features,
    check_resume,
    dataset_fingerprint,
    file_sha256,
    finalize_build,
    load_tail_prior,
    manifest_differences,
    pending_shards,
    read_manifest,
    remove_cache,
    reopen_build,
    shard_name,
    start_build,
    state_dict_sha256,
    teacher_files_sha256,
    verify_cache,
)

__all__ = [
    "compress_logits",
    "expand_logits",
    "index_dtype",
    "check_top_k",
    "TailPrior",
    "topk_error",
    "TAIL_MODES",
    "TAIL_PRIOR_MAX_CLASSES",
    "NO_LSE_MARGIN",
    "ReplayTransform",
    "ReplayedViews",
    "collate_views",
    "default_view_params",
    "DETERMINISTIC_STEPS",
    "REPLAYABLE_STEPS",
    "dataset_fingerprint",
    "read_manifest",
    "manifest_differences",
    "file_sha256",
    "teacher_files_sha256",
    "state_dict_sha256",
    "verify_cache",
    "reopen_build",
    "remove_cache",
    "shard_name",
    "cache_features",
    "check_resume",
    "start_build",
    "pending_shards",
    "ShardWriter",
    "finalize_build",
    "load_tail_prior",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "DATA_DIR",
    "PRIOR_DIR",
    "RECORDS_DIR",
    "TAIL_PRIOR_FILE",
    "BUILD_KEYS",
    "TRAIN_KEYS",
    "TEACHER_KEYS",
    "TeacherCache",
    "CachedViewDataset",
    "collate_cached",
    "CachedTeacher",
]
