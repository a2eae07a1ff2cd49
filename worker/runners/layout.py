"""Names the HiDream hub repositories and HiDream's own scripts use: files, folders, classes, adapted modules.

Shared by the weight lookup (`weights`, `weights_e1`) and the tiny builders (`tiny`), which lay folders out
the same way.
"""

from __future__ import annotations

LORA_FILE = "HiDream-E1-Full.safetensors"  # E1-Full's LoRA + full tensors over I1-Full, as its repo ships it
REFINE_DIR = "refine"  # inside an E1 folder: HiDream-I1-Full's pipeline folder (the scripts' HIDREAM_I1_PATH)
TRANSFORMER_CLASS = "HiDreamImageTransformer2DModel"
EDITING_PIPELINE = "HiDreamImageEditingPipeline"  # the class HiDream-E1-Full's model_index.json names
# The modules HiDream's E1-Full LoRA adapts (its published LoraConfig); the tiny build adapts the same.
LORA_TARGETS = [
    "to_k",
    "to_q",
    "to_v",
    "to_out",
    "to_k_t",
    "to_q_t",
    "to_v_t",
    "to_out_t",
    "w1",
    "w2",
    "w3",
    "final_layer.linear",
]
