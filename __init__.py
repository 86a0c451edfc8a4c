"""ravine: a JAX research toolkit for optimization in deep learning.

One import name for the whole distribution; its folders sit at the repository's top level
and are mapped onto it by setuptools (`package-dir` in pyproject.toml):

    from ravine import optim, models, sharding      # Optax optimizers, Flax models, meshes
    import ravine.experiments                        # the train / race jobs and their runtime

Nothing is imported here eagerly: `import ravine` is cheap, and each subpackage loads JAX
only when it is imported.
"""
__version__ = "0.1.0"
__all__ = ["experiments", "models", "optim", "sharding"]
