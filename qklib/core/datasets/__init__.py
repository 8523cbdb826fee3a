"""Image datasets with object masks: O3 and its generated scenes (`o3`), Pascal VOC (`voc`), ADE20K
(`ade20k`).
"""
