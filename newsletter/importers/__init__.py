"""Readers that turn web pages, feed items and plain-text drafts into article files.

``sources`` is the entry point (`issue add`, `issue import-digest`); ``web``,
``feeds`` and ``draft`` each read one kind of source into an
:class:`~newsletter.importers.common.ImportedArticle`. They import only
``content``, ``config``, ``errors`` and ``files`` from the package.
"""
