"""The students: the study's RNN, the zoo (BiLSTM, CNN) and the shortened transformer; `build` picks one."""
