"""`python -m rnn_ext`: prints the build and machine report that a bug report needs (rnn_ext.info())."""

import rnn_ext

rnn_ext.info()
