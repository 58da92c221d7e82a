"""The synthetic world: identities, their fields and styles (heads), the identity sets, the lab generator."""
