"""Many LoRA adapters over one frozen model in one batch (issue 5).

* ``AdapterSegments`` / ``AdapterSpec`` (segments.py): the per-microbatch row layout; ``SequenceLayouts``: one
  adapter per sequence, the layout following each forward's shape (``generate``).
* ``MultiLoRALinear`` (layer.py), ``MultiLoRAModel`` (model.py): the layer and the model wrapper.
* ``multi_lora_linear`` / ``MultiLoRAFunction`` (function.py) over the backends of backends.py.
* ``save_adapter`` / ``load_adapter`` (io.py): one standard PEFT folder per adapter.
* ``multi_lora_reference`` (reference.py): the float64 truth.
"""
from lorafusion.multi.function import MultiLoRAFunction, multi_lora_linear
from lorafusion.multi.layer import MultiLoRALinear
from lorafusion.multi.model import MultiLoRAModel
from lorafusion.multi.reference import multi_lora_reference
from lorafusion.multi.segments import AdapterSegments, AdapterSpec, SequenceLayouts


def __getattr__(name):  # io imports safetensors / peft lazily
    if name in ("save_adapter", "load_adapter"):
        from lorafusion.multi import io

        return getattr(io, name)
    raise AttributeError(name)


__all__ = ["AdapterSegments", "AdapterSpec", "SequenceLayouts", "MultiLoRALinear", "MultiLoRAModel", "MultiLoRAFunction",
           "multi_lora_linear", "multi_lora_reference", "save_adapter", "load_adapter"]
