"""Imported right after `peft` (see kroncompress/__init__.py): teaches PEFT our factorised layers."""

from kroncompress.peft_compat import install

install()
