"""Code shared by the relay core (``relay``) and the REST shell (``api``): settings, codes, backends."""
