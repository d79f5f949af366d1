"""LoRAM: train small, infer large. Prune a Llama-family model (:mod:`loram.prune`), train LoRA on the pruned model
with any trainer (``lorafusion train`` included), recover the adapter to the full model (:mod:`loram.recover`);
:mod:`loram.pipeline` runs the three with evaluation, ``python -m loram`` from the command line."""
from loram.prune import PrunePlan, PruneError, importance_scores, make_plan, parameter_count, prune_model
from loram.recover import recover_adapter, recover_state_dict

__all__ = ["PrunePlan", "PruneError", "importance_scores", "make_plan", "parameter_count", "prune_model",
           "recover_adapter", "recover_state_dict"]
