"""The op contract: schemas (``schemas``), fake implementations and autograd
formulas (``autograd``), argument checks (``validation``), the dropout seed
(``seed``), determinism, and the backend registry (``registry``)."""
