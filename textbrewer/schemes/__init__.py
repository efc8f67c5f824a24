"""Training schemes beyond one frozen teacher: each a distiller subclass that declares its
phases (optimizer, loss, modules) and runs in the one training loop."""
