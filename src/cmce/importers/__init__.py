"""Importers for the larger data sources; each returns cmce.data.RawImages and is reached through
cmce.data.SOURCES by its data.source name.

emoji                  the cross-vendor emoji set (npm emoji-datasource-google / -twitter, pinned)
retrieval_benchmarks   CUB-200-2011, Cars196 and Stanford Online Products from a local copy
"""
