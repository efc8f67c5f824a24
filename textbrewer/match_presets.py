"""Ready-made intermediate-match presets (TextBrewer's ``matches``), and the features a
match can compare. Plain data: this module imports nothing of the package, so the
configurations can check names against it without loading any loss."""
from typing import Any, Dict, List, Optional

__all__ = ["FEATURES", "MATCHES", "MATCHES_TRANSFORMERS", "layer_matches"]

#: Features that intermediate matches can compare.
FEATURES = ["hidden", "attention"]


def layer_matches(layers_T: List[Any], layers_S: List[Any], feature: str, loss: str,
                  weight: float = 1, proj: Optional[List[Any]] = None) -> List[Dict[str, Any]]:
    """One match dict per (teacher layer, student layer) pair, all with the same settings."""
    if len(layers_T) != len(layers_S):
        raise ValueError(f"layers_T has {len(layers_T)} entries but layers_S has {len(layers_S)}")
    matches = []
    for layer_T, layer_S in zip(layers_T, layers_S):
        match = {"layer_T": layer_T, "layer_S": layer_S, "feature": feature, "loss": loss,
                 "weight": weight}
        if proj is not None:
            match["proj"] = list(proj)
        matches.append(match)
    return matches


def _pairs(layers):
    return [[layer, layer] for layer in layers]


def _presets(attention_offset: int) -> Dict[str, List[Dict[str, Any]]]:
    """Presets for a 12-layer teacher; attention indices shifted by ``attention_offset``."""
    presets: Dict[str, List[Dict[str, Any]]] = {}
    for variant in ("mse", "ce", "mse_sum", "ce_mean"):
        loss = f"attention_{variant}"
        presets[f"L3_{loss}"] = layer_matches(
            [t - attention_offset for t in (4, 8, 12)],
            [s - attention_offset for s in (1, 2, 3)], "attention", loss)
        presets[f"L4_{loss}"] = layer_matches(
            [t - attention_offset for t in (3, 6, 9, 12)],
            [s - attention_offset for s in (1, 2, 3, 4)], "attention", loss)
    presets["L3_hidden_mse"] = layer_matches([0, 4, 8, 12], [0, 1, 2, 3], "hidden", "hidden_mse")
    presets["L3n_hidden_mse"] = layer_matches([0, 4, 8, 12], [0, 1, 2, 3], "hidden",
                                              "hidden_mse", proj=["linear", 384, 768])
    presets["L3_hidden_smmd"] = layer_matches(_pairs([0, 4, 8, 12]), _pairs(range(4)),
                                              "hidden", "nst")
    presets["L4_hidden_smmd"] = layer_matches(_pairs([0, 3, 6, 9, 12]), _pairs(range(5)),
                                              "hidden", "nst")
    presets["L4t_hidden_mse"] = layer_matches([0, 3, 6, 9, 12], list(range(5)), "hidden",
                                              "hidden_mse", proj=["linear", 312, 768])
    presets["L4t_hidden_sgram"] = layer_matches(_pairs([0, 3, 6, 9, 12]), _pairs(range(5)),
                                                "hidden", "gram", proj=["linear", 312, 768])
    presets["L6_hidden_mse"] = layer_matches(list(range(0, 13, 2)), list(range(7)), "hidden",
                                             "hidden_mse")
    presets["L6_hidden_smmd"] = layer_matches(_pairs(range(0, 13, 2)), _pairs(range(7)),
                                              "hidden", "nst")
    presets["small_hidden_mse"] = layer_matches(list(range(13)), list(range(13)), "hidden",
                                                "hidden_mse", proj=["linear", 256, 768])
    presets["small_hidden_smmd"] = layer_matches(_pairs(range(13)), _pairs(range(13)),
                                                 "hidden", "nst")
    return presets


#: Presets as TextBrewer's examples wrote them, for a BERT whose adaptor returns 13 hidden
#: states (embeddings = 0) and counts attention layers from 1 (teacher attention 1..12).
MATCHES: Dict[str, List[Dict[str, Any]]] = _presets(attention_offset=0)
#: The same presets for ``transformers`` models: ``hidden_states`` has the embeddings at 0
#: (unchanged), but ``attentions`` has one entry per layer starting at 0, so every
#: attention index is one lower (teacher 0..11).
MATCHES_TRANSFORMERS: Dict[str, List[Dict[str, Any]]] = _presets(attention_offset=1)
