"""REST route modules, one per resource."""
