"""Offline teacher outputs for language-model distillation.

Run the teacher once (:func:`write_teacher_cache`), keep its top-k token ids, their
log-probs and the tail mass for every valid token, then train students against the
memory-mapped cache (:class:`TeacherCache`, :class:`CachedTeacherCollator`) without
loading the teacher. Format and figures: ``docs/teacher_cache.md``. Command line:
``python -m textbrewer.cache build|info``.
"""
from .data import CachedTeacherCollator, IndexedDataset
from .manifest import (POSITION_RULES, FileEntry, ShardInfo, TeacherCacheManifest,
                       example_hash, id_dtype_for_vocab, teacher_fingerprint)
from .reader import TeacherCache
from .writer import default_logits_fn, pad_collate, write_teacher_cache

__all__ = ["write_teacher_cache", "TeacherCache", "TeacherCacheManifest", "IndexedDataset",
           "CachedTeacherCollator", "pad_collate", "default_logits_fn", "teacher_fingerprint",
           "example_hash", "id_dtype_for_vocab", "POSITION_RULES", "FileEntry", "ShardInfo"]
