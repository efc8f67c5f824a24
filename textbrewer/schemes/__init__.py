"""Training schemes beyond one frozen teacher: each a distiller subclass that declares its
phases (optimizer, loss, modules) and runs in the one training loop.

- online: :class:`MutualLearningDistiller` (deep mutual learning);
- self-distillation: :class:`SelfDistiller` (Be Your Own Teacher), :func:`born_again`;
- adversarial: :class:`AdversarialDistiller`;
- data-free: :class:`DFADDistiller`, :class:`DeepInversionSynthesizer`,
  :func:`synthesize_deep_inversion`;
- quantization-aware: :class:`QATDistiller`, :func:`prepare_qat_student`,
  :func:`convert_to_int8`;
- cross-modal: :class:`TwoViewCollate` (teacher and student fed different views);
- multi-teacher weighting: :class:`WeightedMultiTeacherDistiller`;
- teacher assistants: :func:`distil_through_assistants` (teacher → assistant → student).
"""
from .adversarial import AdversarialDistiller, MLPDiscriminator, frozen_call
from .cross_modal import TwoViewCollate, downsample, row_column_profiles
from .data_free import (DeepInversionSynthesizer, DFADDistiller, MLPGenerator, NoiseBatches,
                        SyntheticBatch, synthesize_deep_inversion, total_variation)
from .mutual import MutualLearningDistiller, peer_checkpoint_path
from .qat import QATDistiller, convert_to_int8, prepare_qat_student, state_dict_bytes
from .self_distillation import Generation, SelfDistiller, born_again
from .teacher_assistant import AssistantStage, distil_through_assistants
from .weighted_teachers import WeightedMultiTeacherDistiller, teacher_weights

__all__ = ["MutualLearningDistiller", "peer_checkpoint_path", "SelfDistiller", "Generation",
           "born_again", "AdversarialDistiller", "MLPDiscriminator", "frozen_call",
           "DFADDistiller", "DeepInversionSynthesizer", "MLPGenerator", "NoiseBatches",
           "SyntheticBatch", "synthesize_deep_inversion", "total_variation", "QATDistiller",
           "prepare_qat_student", "convert_to_int8", "state_dict_bytes", "TwoViewCollate",
           "downsample", "row_column_profiles", "WeightedMultiTeacherDistiller",
           "teacher_weights", "AssistantStage", "distil_through_assistants"]
