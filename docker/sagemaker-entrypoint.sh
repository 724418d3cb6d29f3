#!/bin/sh
# The start of the image's `sagemaker` target on Amazon SageMaker, which runs the container as
# `docker run IMAGE serve`, sends its health checks (/ping) and requests (/invocations) to port 8080 (or
# SAGEMAKER_BIND_TO_PORT) and unpacks the model's artifacts into /opt/ml/model. The model: LCQ_MODEL, else
# HF_MODEL_ID (at HF_MODEL_REVISION), as Hugging Face's SageMaker images name one, else /opt/ml/model where it
# holds files. Other arguments and LCQ_* settings reach `lcq serve` as they are.
set -e
if [ "$1" = "serve" ]; then
    shift
fi
if [ -z "$LCQ_MODEL" ] && [ -n "$HF_MODEL_ID" ]; then
    export LCQ_MODEL="$HF_MODEL_ID"
    if [ -z "$LCQ_REVISION" ] && [ -n "$HF_MODEL_REVISION" ]; then
        export LCQ_REVISION="$HF_MODEL_REVISION"
    fi
elif [ -z "$LCQ_MODEL" ] && [ -n "$(ls -A /opt/ml/model 2>/dev/null)" ]; then
    export LCQ_MODEL=/opt/ml/model
fi
export LCQ_HOST="${LCQ_HOST:-0.0.0.0}"
export LCQ_PORT="${SAGEMAKER_BIND_TO_PORT:-8080}"
exec lcq serve "$@"
