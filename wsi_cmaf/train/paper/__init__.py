"""The paper's protocols: the tables and figures of Ativi et al. (``wsi-cmaf protocol``), their
reports, and the efficiency table (Table 8)."""
