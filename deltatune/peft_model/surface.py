"""The parts of peft's ``PeftModel`` surface that are attributes and switches, not the core.

``PeftSurface`` is a mixin of ``PeftModel``: peft's attributes (``active_peft_config``,
``modules_to_save``, ``prompt_encoder``), the persistent switch ``disable_adapter_layers`` /
``enable_adapter_layers`` (the context ``disable_adapter`` is in ``model``), and two helpers peft
users call: ``prepare_model_for_gradient_checkpointing`` and ``push_to_hub``.
"""
from __future__ import annotations

import os
import tempfile
import warnings

from torch import nn


class PeftSurface:
    """Mixed into ``PeftModel`` (which provides ``adapter_set``, ``base_model``, ``peft_config``...)."""

    @property
    def active_peft_config(self):
        """The active adapter's config (peft's attribute)."""
        return self.peft_config[self.active_adapter]

    @property
    def modules_to_save(self) -> set[str] | None:
        """Names every adapter's ``modules_to_save`` lists, as a set (None when there are none), as peft."""
        names = {n for c in self.peft_config.values() for n in (getattr(c, "modules_to_save", None) or [])}
        return names or None

    @property
    def prompt_encoder(self) -> nn.ModuleDict:
        """Adapter name -> its virtual-token module (prompt, prefix and P-tuning), peft's attribute."""
        return self.base_model.components

    def disable_adapter_layers(self) -> None:
        """Run the bare base model until ``enable_adapter_layers`` (peft's switch; the context
        manager ``disable_adapter`` does the same for a block). Merged adapters are unmerged first,
        with a warning; adapter parameters do not train while disabled."""
        if self.adapter_set.merged:
            warnings.warn(f"disable_adapter_layers(): unmerging adapter(s) {self.adapter_set.merged} from the base "
                          "weights", stacklevel=2)
            self.unmerge_adapter()
        self.adapter_set.disabled = True
        for name in self.peft_config:
            for p in self.base_model.adapter_parameters(name):
                p.requires_grad_(False)
        self.base_model.sync_biases([])

    def enable_adapter_layers(self) -> None:
        """Apply the active adapter again (and make it trainable, unless in inference mode)."""
        self.adapter_set.disabled = False
        self._refresh()

    def prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> nn.Module:
        """Make ``model``'s input embeddings' output require grad (returns ``model``), as peft does:
        with frozen embeddings, checkpointed layers would otherwise see no graph to recompute.
        Quantized models are left alone (``prepare_model_for_kbit_training`` does it there)."""
        if any(getattr(model, flag, False) for flag in ("is_loaded_in_8bit", "is_loaded_in_4bit", "is_quantized")):
            return model
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        elif hasattr(model, "get_input_embeddings"):
            model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_(True))
        return model

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload adapter", **save_kwargs) -> str:
        """Save the adapters (``save_pretrained``) and upload the directory to the Hub repo ``repo_id``.

        Raises:
            ConnectionError: offline (``HF_HUB_OFFLINE``): nothing can be uploaded; the message says
                to ``save_pretrained`` and upload the directory later.
        """
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise ConnectionError(f"push_to_hub({repo_id!r}): the Hugging Face Hub is offline here (HF_HUB_OFFLINE is "
                                  "set), so nothing was uploaded; save_pretrained(directory) now and upload that "
                                  "directory (huggingface_hub.upload_folder) when online")
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            directory = os.path.join(tmp, "adapter")
            self.save_pretrained(directory, **save_kwargs)
            return str(api.upload_folder(repo_id=repo_id, folder_path=directory, commit_message=commit_message))
