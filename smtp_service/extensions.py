"""Flask extensions, created unbound; the app factory binds them."""

from flask_jwt_extended import JWTManager

jwt = JWTManager()
