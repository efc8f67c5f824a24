"""Teacher sources: where an LM distiller's teacher distribution comes from.

One protocol (:class:`TeacherSource`: ``rows(batch, examples)`` -> the teacher's top-k per
position, the layout of a teacher cache) and its implementations: a module in this
process (:class:`LocalTeacher`), a cache (:class:`CachedTeacherSource`), the cache with
the live teacher for what it lacks (:class:`CacheThenLiveTeacher`), an OpenAI-compatible
server (:class:`ServedTeacher`), and several teachers (:class:`MixtureTeacher`,
:class:`RoutedTeacher`). :class:`TeacherSourceCollator` attaches a source's rows to each
batch, and the LM distillers train from them with ``model_T=None`` exactly as from a
cache (``divergence`` taken against the rows). For the classifier distillers and schemes,
:mod:`textbrewer.teachers.outputs` does the same with the teacher's outputs per batch
(:class:`TeacherOutputsCollator`). See docs/teachers.md.
"""
from .base import ROW_KEYS, TeacherRows, TeacherSource, TeacherSourceCollator  # noqa: F401
from .ensemble import MixtureTeacher, RoutedTeacher  # noqa: F401
from .local import CachedTeacherSource, CacheThenLiveTeacher, LocalTeacher  # noqa: F401
from .served import ServedTeacher  # noqa: F401
from .outputs import (CachedOutputs, LocalOutputs, MixtureOutputs, OutputsSource,  # noqa: F401
                      RoutedOutputs, TeacherOutputsCollator, write_teacher_outputs)

__all__ = ["TeacherSource", "TeacherRows", "TeacherSourceCollator", "ROW_KEYS",
           "LocalTeacher", "CachedTeacherSource", "CacheThenLiveTeacher", "ServedTeacher",
           "MixtureTeacher", "RoutedTeacher", "OutputsSource", "LocalOutputs", "CachedOutputs",
           "MixtureOutputs", "RoutedOutputs", "TeacherOutputsCollator", "write_teacher_outputs"]
