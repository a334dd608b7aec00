"""What the three packages of carbon-router (``router``, ``regions``, ``forecasting``) share:
the root of their exceptions (:mod:`carbonrouter.errors`)."""
