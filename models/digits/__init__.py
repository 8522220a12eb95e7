"""The bundled ``digits`` model: a LeNet-5 digit finder, trained and measured by its recipe.

- :mod:`models.digits.data`: the fixed split of scikit-learn's ``load_digits`` and the
  page convention (dark ink on light paper);
- :mod:`models.digits.windows`: training windows (digits centred within half a stride, or
  ``background``);
- :mod:`models.digits.pages`: synthetic pages from held-out digits (demo and evaluation);
- :mod:`models.digits.reading`: reading a page from a dense map (numpy only);
- :mod:`models.digits.train`: ``python -m models.digits.train`` (needs torch);
- :mod:`models.digits.evaluate`: the model card's numbers from the shipped ONNX (no torch).
"""
