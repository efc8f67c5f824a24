"""Loss functions, with TextBrewer 0.2.1's names.

Response (logits): :func:`kd_ce_loss`, :func:`kd_mse_loss`, :func:`kd_kl_loss`.
Feature (one layer): :func:`att_mse_loss`, :func:`att_mse_sum_loss`, :func:`att_ce_loss`,
:func:`att_ce_mean_loss`, :func:`hid_mse_loss`, :func:`cos_loss`, :func:`pkd_loss`.
Relation (two layers): :func:`fsp_loss`, :func:`mmd_loss`, :func:`mmd_normalized_loss`.

Beyond 0.2.1, response: :func:`kd_reverse_kl_loss` (``'reverse_kl'``), :func:`kd_jsd_loss`
(``'jsd'``), both τ²-scaled; :func:`reverse_kl_loss` and :func:`jsd_loss` are their old
names, kept as aliases. The token-level LM losses (no τ², mean over valid tokens) are in
:mod:`textbrewer.losses.token` (:func:`~textbrewer.losses.token.token_reverse_kl_loss`,
:func:`~textbrewer.losses.token.token_jsd_loss`, ...).

Importing this package registers them in :data:`textbrewer.registry.KD_LOSSES` and
:data:`textbrewer.registry.MATCH_LOSSES`.
"""
from .feature import (att_ce_loss, att_ce_mean_loss, att_mse_loss, att_mse_sum_loss,
                      cos_loss, hid_mse_loss, pkd_loss)
from .feature import attention_transfer_loss, fitnet_loss
from .modules import CRDLoss, VIDLoss
from .relation import fsp_loss, mmd_loss, mmd_normalized_loss
from .relation import cc_loss, pkt_loss, rkd_angle_loss, rkd_distance_loss, sp_loss
from .response import kd_ce_loss, kd_kl_loss, kd_mse_loss
from .response import bce_loss, jsd_loss, kd_jsd_loss, kd_reverse_kl_loss, reverse_kl_loss
from .structured import (dist_loss, dist_loss_builder, dkd_loss, dkd_loss_builder,
                         logit_standardization, standardized_loss_builder)
from . import token  # noqa: F401  (registers TOKEN_LOSSES; API in textbrewer.losses.token)

__all__ = ["kd_ce_loss", "kd_mse_loss", "kd_kl_loss", "att_mse_loss", "att_mse_sum_loss",
           "att_ce_loss", "att_ce_mean_loss", "hid_mse_loss", "cos_loss", "pkd_loss",
           "fsp_loss", "mmd_loss", "mmd_normalized_loss"]
__all__ += ["kd_reverse_kl_loss", "kd_jsd_loss", "reverse_kl_loss", "jsd_loss", "dkd_loss",
            "dkd_loss_builder", "dist_loss", "dist_loss_builder", "logit_standardization",
            "standardized_loss_builder", "bce_loss", "fitnet_loss", "attention_transfer_loss",
            "rkd_distance_loss", "rkd_angle_loss", "pkt_loss", "sp_loss", "cc_loss", "VIDLoss",
            "CRDLoss"]
