"""Pure algorithm: peer selection, teacher prompts, losses. Imports torch and the standard library only."""
