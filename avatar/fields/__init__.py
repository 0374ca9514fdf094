"""Neural fields: hash-grid NeRF (coarse), DMTet geometry and texture field (fine)."""
