"""The worker node: hardware probe, renderers, the pull loop, the daemon and its CLI.

Importing it quiets the third-party import-time chatter torch, torchao and diffusers print
on every command (native libraries this CPU build lacks, deprecations in torch's pytree,
torchao tensors diffusers cannot import): it says nothing an operator can act on, and buried
the node's own lines. Only those named loggers are raised to ERROR; the node's structured
events are untouched.
"""

import logging as _logging
import os as _os

# transformers configures its own root logger when imported, so a level set here would be
# overwritten: its documented switch is the environment ("requires torchvision ... falling
# back to CLIPImageProcessorPil" on every model load). An operator's own setting wins.
_os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

for _name in (
    "torchao",  # "Failed to load .../_C_mxfp8...so" on builds without CUDA kernels
    "torch.utils._pytree",  # "<enum ...> is an Enum subclass ... register_constant()"
    "diffusers.quantizers.torchao.torchao_quantizer",  # "Unable to import `torchao` Tensor"
):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
