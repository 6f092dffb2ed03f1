#!/bin/bash
#$ -S /bin/bash
#$ -N {{job_name}}
{{resources}}
#$ -l h_rt={{walltime}}
{{cwd}}
#$ -o {{log_dir}}
#$ -j y
{{array}}
# SGE job script rendered by retrieval.cluster (default template retrieval/templates/qsub.sh).
# Every #$ directive sits above the first command: SGE reads embedded options from the header.

set -eo pipefail
{{setup}}
{{command}}
