"""The Quax library's example types under their Quax names, backed by quax's types:
`quax.examples.named.NamedArray`, `.sparse.BCOO`, `.structured_matrices.
TridiagonalMatrix`, `.prng.ThreeFry`, `.unitful.Unitful` (import the submodule)."""
