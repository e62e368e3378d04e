"""Verification of renders: re-running one committed denoising step (`step_check`).

Imported lazily by callers: `step_check` needs torch (and a diffusers pipeline to check with).
See docs/VERIFICATION.md.
"""
