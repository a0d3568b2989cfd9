"""The OpenAPI document: schemas of the JSON bodies, each route's operation, and the builder."""
