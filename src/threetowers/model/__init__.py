"""The contrastive model: `ThreeTowers` (pure: built towers, heads, the term loss), its losses,
and the factory that builds, saves and loads it."""
