"""The artifact: typed versioned `millis.json` (meta), atomic write and verify (store), the kept validation split
(validation), and `millis.load` -> `Model` (model)."""
