"""Domain errors, mapped to HTTP in one place (`web.errors`) and to CLI messages in `cli`."""


class InsertcoinError(Exception):
    """Base for errors with a message meant for the operator."""


class ConfigError(InsertcoinError):
    """Settings that cannot work; the message names the variable to fix."""


class NotFound(InsertcoinError):
    pass


class Conflict(InsertcoinError):
    pass


class Invalid(InsertcoinError):
    """A well-formed request that the domain refuses (e.g. a disabled cabinet)."""


class Unauthorized(InsertcoinError):
    pass


class Forbidden(InsertcoinError):
    pass
