"""The evidence study of issue 13: when does SAGE help? (docs/study.md)

* :mod:`torchsage.study.spec`: what runs (fixed before any result was seen);
* :mod:`torchsage.study.pilot`: the step-count pilot;
* :mod:`torchsage.study.budget`: the CPU estimate of every part;
* :mod:`torchsage.study.stats`: intervals, paired tests, Holm, least squares;
* :mod:`torchsage.study.theory`: the alignment and curvature terms against the out-of-domain gap;
* :mod:`torchsage.study.report`: tables and figures;
* ``python -m torchsage.study``: the commands.
"""
