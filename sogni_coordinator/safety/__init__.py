"""The image check before delivery (docs/SAFETY.md): a detector behind a small interface
(`detector`), the policy that turns its scores into an action (`image_policy`), the blur and
the placeholder (`redact`), and the dispatcher's entry point (`screen`)."""
